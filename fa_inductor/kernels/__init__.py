"""Computing attention: Triton kernels, host launchers, the registered op and its configs."""
