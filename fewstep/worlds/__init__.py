"""The embedded worlds fewstep runs on without downloads: digits (scikit-learn's 8x8 digits, a shipped teacher and
evaluator).
"""
