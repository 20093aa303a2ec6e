"""Discord cogs: one per area of the bot (imagine, community, moderation)."""
