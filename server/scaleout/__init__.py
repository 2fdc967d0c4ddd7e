"""Scale-out on Ray Serve (`flux2-server serve --ray`): the same fal front door as an ingress deployment,
over GPU worker replicas routed by LoRA set. Imported only in that mode: Ray is an optional install."""
