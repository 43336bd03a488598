"""The lab's one number formatter, shared by the lab, its reports and the probes' command-line programs.

    numbers.py                Numbers with one unit per row: durations, byte amounts, rates, counts, p-values.
"""
