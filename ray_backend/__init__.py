"""Ray front door: SandboxActor and warm pools (a later issue)."""
