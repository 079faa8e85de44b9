"""What people read: figures, the evaluation report, the qc and uncertainty reports."""
