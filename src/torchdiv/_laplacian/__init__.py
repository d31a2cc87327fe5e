"""The Laplacian family's engines besides Taylor mode: directions, loops."""
