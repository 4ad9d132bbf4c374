"""The official TensorFlow CapsNet checkpoints as model folders: `converter.convert` reads them (`tf_checkpoint`,
`checkpoint_paths`), infers the network (`geometry`), maps the weights (`weights`), checks the result against the
NumPy reference (`reference`, `parity`) and writes the card (`card`)."""
