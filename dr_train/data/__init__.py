"""Training data: video I/O, subject masks, encoding, WebDataset shards, the streaming loader and the built-in
synthetic relations. Import the submodules directly (`dr_train.data.loader`, ...)."""
