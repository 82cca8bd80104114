"""The embedded digits world: scikit-learn's 8x8 digits, a shipped class-conditional teacher and an evaluator."""
