"""The lab's one number formatter and its line width, shared by the lab, its reports and the probes' command-line programs.

    numbers.py                Numbers with one unit per row: durations, byte amounts, rates, counts, p-values.
    text_width.py             Lines at most 120 columns: prose and shell commands folded (tables fold themselves).
"""
