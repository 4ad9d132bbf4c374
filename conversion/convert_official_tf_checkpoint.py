"""Convert the official TensorFlow CapsNet checkpoints into transformers model folders (no TensorFlow needed).

    python conversion/convert_official_tf_checkpoint.py --checkpoint PATH/mnist_checkpoint/model.ckpt-1 \
        --output_dir capsnet-mnist-official
    python conversion/convert_official_tf_checkpoint.py --checkpoint 'PATH/cifar/cifar{}/model.ckpt-600000' \
        --num_trials 7 --output_dir capsnet-cifar10-official

Same as the `capsnet-convert` console script; see `capsnet_hf/convert.py` and conversion/README.md.
"""

import sys

from capsnet_hf.convert import main

if __name__ == "__main__":
    sys.exit(main())
