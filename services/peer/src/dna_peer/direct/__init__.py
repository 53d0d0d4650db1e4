"""Direct messaging between two online peers: ICE (aioice) and an authenticated channel."""
