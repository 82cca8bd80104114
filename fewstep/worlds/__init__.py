"""The embedded worlds fewstep runs on without downloads: digits (scikit-learn's 8x8 digits, a shipped teacher and
evaluator) and video (those digits moving on a 16x16 canvas for 8 frames, a shipped Wan teacher and clip evaluator).

Importing this package loads nothing heavy: the command line reads ``EMBEDDED`` from here.
"""

EMBEDDED = ("digits", "video")  # the embedded worlds, each a name that stands for its shipped teacher

# The guidance each embedded teacher is sampled (and benched) at, and that recipes distil into their students (which
# then sample at 1). Video: 1.5, from `fewstep bench video --guidance` at 4 and 50 steps (1,000 clips, seed 0): class
# accuracy 96.9% / 92.8% at w 1, 99.6% / 98.8% at 1.5; clip FD 56.7 / 48.9 at 1, 55.8 / 35.9 at 1.5, 129 at 2 and
# 257 at 3 (4 steps), where the samples lose their variety.
TEACHER_GUIDANCE = {"digits": 1.0, "video": 1.5}
# Where that guidance applies, (lo, hi] of the flow sigma (Kynkaanniemi et al. 2024; sampling.guidance_at), written
# into the teacher folder's model_index.json so that the pipeline applies it by itself. Video: (0.2, 0.85], EDM2's
# interval (sigma in (0.28, 5.42]) read as t = sigma / (1 + sigma); at 50 steps and w 1.5 (1,000 clips, seed 0) clip
# FD 24.8 and frame FID 7.2 against 35.9 and 9.1 guided everywhere, class accuracy 98.1% against 98.8%; at w 2 on it
# 50.7 and 14.6.
TEACHER_GUIDANCE_INTERVAL = {"video": (0.2, 0.85)}


def teacher_guidance(name: str) -> float:
    """The guidance ``name`` samples at by default: an embedded world's teacher its world's, any other model 1."""
    return TEACHER_GUIDANCE.get(name, 1.0)
