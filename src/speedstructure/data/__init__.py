"""The challenge's data: format, zips, the store, K-Means folds, submissions, test sets."""
