"""The embedded worlds fewstep runs on without downloads: digits (scikit-learn's 8x8 digits, a shipped teacher and
evaluator) and video (those digits moving on a 16x16 canvas for 8 frames, a shipped Wan teacher and clip evaluator).

Importing this package loads nothing heavy: the command line reads ``EMBEDDED`` from here.
"""

EMBEDDED = ("digits", "video")  # the embedded worlds, each a name that stands for its shipped teacher
