"""spinfx.passes"""
