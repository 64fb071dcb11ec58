"""Frontend: tracing with torch.export, split markers, graph splitting into a Pipe."""
