"""Stage 3 of the data path: the exported student folder (pipeline), the scheduler it ships (scheduling_fewstep, when
no stock one fits) and Phased DMD's per-phase experts.
"""
