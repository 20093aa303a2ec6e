"""The GPU side: pipelines, txt2img / img2img / upscale, styles, previews, metadata."""
