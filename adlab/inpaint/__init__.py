"""inpaint"""
