"""Placeholder until the proxy lands."""
print("wirefault demo: will start a throwaway PostgreSQL, the proxy in front of it, "
      "arm conn.onQuery(query=\"^COMMIT\").kill(), and show a traffic dump.")
