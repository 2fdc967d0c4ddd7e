"""The fetch stage: everything a request needs from outside the machine (LoRA files now, reference images
next), fetched in the HTTP process before the request is queued, so the GPU never waits on the network.
Every outgoing connection goes through `address_guard`."""
