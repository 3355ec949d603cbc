"""The simulated developer and its statistics: replays a repository through the real
server over LSP, has the nightly job train on half of it, and measures the other half
before and after. Nothing in the server, the store or the trainer imports it."""
