"""Below everything: argument checks, modes, basis vectors, sample-mixing detection."""
