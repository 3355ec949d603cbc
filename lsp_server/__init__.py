"""The Ghostloop language server (pygls): documents, completion engine, feedback tracking."""
