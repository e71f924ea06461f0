"""attnscope.deployments"""
