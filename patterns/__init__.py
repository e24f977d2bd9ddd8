"""spinfx.patterns"""
