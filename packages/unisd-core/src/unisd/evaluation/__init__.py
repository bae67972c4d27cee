"""Evaluation: greedy accuracy of student and teacher-with-reference, and leakage of teacher-only text."""
