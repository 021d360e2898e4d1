"""What people run: the ``fused-resnet`` command line (one module per command) and its helpers (benchmark timing,
data sets). The library never imports this package."""
