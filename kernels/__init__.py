"""attnscope.kernels"""
