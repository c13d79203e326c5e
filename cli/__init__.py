"""omx.cli"""
