"""Raw kernels: the pure-PyTorch reference (``reference``), Triton (``triton``) and, in ``csrc/``, CUDA."""
