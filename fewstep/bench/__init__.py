"""Stage 4 of the data path: ``fewstep bench`` (run), what it measures (measure, metrics, clip), against which world
(worlds), and the report people read (report, images).
"""
