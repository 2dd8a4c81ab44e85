from flow_nexus_server.schema_export import DEFAULT_DIR, stale_files


def test_committed_schemas_match_the_code():
    stale = stale_files(DEFAULT_DIR)
    assert stale == [], f"run `flow-nexus-server schemas` to regenerate: {stale}"
