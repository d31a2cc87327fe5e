"""The public face: function form, graph form, Laplacian family, error reporting."""
