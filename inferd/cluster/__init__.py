"""Scale-out: the request router shared by the Ray Serve ingress and the cluster simulator, the simulator itself,
and the Ray Serve deployment (imported lazily: Ray is an optional extra)."""
