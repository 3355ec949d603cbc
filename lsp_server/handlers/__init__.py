"""One module per LSP method; each handler turns params into a plain call and back."""
