"""Connection-state sync: records (ctnetlink attributes), the wire format (HMAC, replay
window) and the replication session. Pure."""
