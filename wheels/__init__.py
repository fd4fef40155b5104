"""Lock files, one per supported runtime fingerprint (shipped inside fastsd as ``fastsd._wheels``)."""
