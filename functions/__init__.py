"""omx.functions"""
