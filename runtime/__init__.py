"""omx.runtime"""
