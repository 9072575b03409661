"""Ray Data stages around skipengine: sources, prompts, the generator actor, sinks, resume, run stats."""
