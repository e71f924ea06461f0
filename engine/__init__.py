"""attnscope.engine"""
