"""Quantization: the schemes (what a model's weights are held as, with one set of defaults)
and the transform that turns a checkpoint's layers into the kernels' packed modules."""
