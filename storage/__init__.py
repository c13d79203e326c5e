"""omx.storage"""
