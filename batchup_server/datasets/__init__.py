"""Standard datasets (MNIST, CIFAR, ...): download, conversion to HDF5, serving by name."""
