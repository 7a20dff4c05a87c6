"""What a restricted role may touch besides its own tables: curated, closed lists.

Strategy: everything not named here is refused. The lists are checked against
PostgreSQL's own parse of the statement pgwarden sends (proxy/analysis/verify.py),
so a name means exactly what PostgreSQL will call.

Rules:
* SAFE_FUNCTIONS holds built-ins that compute on their arguments only: no file,
  network, large-object, dynamic-SQL, settings-changing, sleeping, locking or
  statistics function, and nothing that reads a table by name (query_to_xml,
  table_to_xml, ...). pg_advisory_unlock_all() only releases the session's own
  advisory locks (asyncpg's pool calls it on every release). set_config is
  refused except for a SAFE_SETTINGS name written as a literal (verify.py): the
  same change SET may make. Catalog introspection functions that psql, pgAdmin, DBeaver
  and JDBC metadata queries call are included: they describe objects, not data.
* CATALOG_RELATIONS are the catalog tables and views those tools read; anything
  else in pg_catalog or information_schema (pg_stats, pg_statistic,
  pg_stat_activity, pg_authid, pg_largeobject, ...) is refused.
* SAFE_SETTINGS may be changed with SET/RESET by a restricted role; they change
  presentation and resource limits, never identity, lexing or name resolution.
"""

from __future__ import annotations

_STRING = """
ascii bit_length btrim char_length character_length chr concat concat_ws convert_from
convert_to decode encode format initcap left length lower lpad ltrim md5 normalize
octet_length overlay position quote_ident quote_literal quote_nullable regexp_count
regexp_instr regexp_like regexp_match regexp_matches regexp_replace regexp_split_to_array
regexp_split_to_table regexp_substr repeat replace reverse right rpad rtrim split_part
starts_with string_to_array string_to_table strpos substr substring to_ascii to_hex
translate trim unistr upper casefold sha224 sha256 sha384 sha512 crc32 crc32c
like_escape similar_to_escape similar_escape textlen textcat text
"""
_NUMERIC = """
abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale mod
pi power radians random random_normal round scale sign sqrt trim_scale trunc width_bucket
acos acosd asin asind atan atan2 atan2d atand cos cosd cot cotd sin sind tan tand sinh
cosh tanh asinh acosh atanh erf erfc gamma lgamma numeric int2 int4 int8 float4 float8
setseed
"""
_TIME = """
age clock_timestamp current_date current_time current_timestamp date_add date_bin
date_part date_subtract date_trunc extract isfinite justify_days justify_hours
justify_interval localtime localtimestamp make_date make_interval make_time
make_timestamp make_timestamptz now statement_timestamp timeofday
transaction_timestamp to_char to_date to_number to_timestamp timezone overlaps
"""
_AGGREGATE = """
count sum avg min max bool_and bool_or every stddev stddev_pop stddev_samp variance
var_pop var_samp corr covar_pop covar_samp regr_avgx regr_avgy regr_count
regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy mode percentile_cont
percentile_disc rank dense_rank percent_rank cume_dist row_number ntile lag lead
first_value last_value nth_value grouping string_agg array_agg json_agg jsonb_agg
json_object_agg jsonb_object_agg any_value bit_and bit_or bit_xor
"""
_ARRAY_JSON = """
array_append array_cat array_dims array_fill array_length array_lower array_ndims
array_position array_positions array_prepend array_remove array_replace array_to_string
array_upper cardinality unnest generate_series generate_subscripts array_sample
array_shuffle trim_array array_reverse array_sort
to_json to_jsonb json_build_array jsonb_build_array json_build_object
jsonb_build_object json_object jsonb_object json_array_length jsonb_array_length
json_typeof jsonb_typeof json_extract_path jsonb_extract_path json_extract_path_text
jsonb_extract_path_text jsonb_pretty jsonb_set jsonb_insert jsonb_strip_nulls
json_strip_nulls json_array_elements jsonb_array_elements json_array_elements_text
jsonb_array_elements_text json_each jsonb_each json_each_text jsonb_each_text
json_object_keys jsonb_object_keys row_to_json array_to_json jsonb_path_exists
jsonb_path_match jsonb_path_query jsonb_path_query_array jsonb_path_query_first
"""
_MISC = """
coalesce nullif greatest least num_nonnulls num_nulls gen_random_uuid uuidv4 uuidv7
version current_database current_schema current_schemas current_user session_user
user current_role current_catalog inet_client_addr inet_server_addr inet_server_port
pg_backend_pid pg_postmaster_start_time pg_conf_load_time txid_current
pg_current_xact_id pg_current_xact_id_if_assigned pg_is_in_recovery
bool int4range int8range numrange tsrange tstzrange daterange lower_inf upper_inf
isempty range_merge host masklen network family abbrev broadcast netmask hostmask
current_setting getdatabaseencoding pg_client_encoding pg_advisory_unlock_all
"""
_INTROSPECTION = """
format_type pg_get_expr pg_get_indexdef pg_get_constraintdef pg_get_viewdef
pg_get_ruledef pg_get_triggerdef pg_get_functiondef pg_get_function_arguments
pg_get_function_identity_arguments pg_get_function_result pg_get_function_sqlbody
pg_get_partkeydef pg_get_partition_constraintdef pg_get_serial_sequence
pg_get_statisticsobjdef pg_get_statisticsobjdef_columns pg_get_statisticsobjdef_expressions
pg_get_userbyid pg_get_keywords pg_get_catalog_foreign_keys pg_table_is_visible
pg_type_is_visible pg_function_is_visible pg_operator_is_visible pg_opclass_is_visible
pg_collation_is_visible pg_conversion_is_visible pg_statistics_obj_is_visible
pg_ts_config_is_visible pg_ts_dict_is_visible pg_ts_parser_is_visible
pg_ts_template_is_visible pg_opfamily_is_visible pg_encoding_to_char pg_char_to_encoding
obj_description col_description shobj_description pg_describe_object
pg_identify_object pg_identify_object_as_address pg_relation_size pg_table_size
pg_indexes_size pg_total_relation_size pg_size_pretty pg_size_bytes pg_relation_filenode
pg_column_size pg_tablespace_location pg_database_size pg_my_temp_schema
pg_is_other_temp_schema pg_has_role has_table_privilege has_column_privilege
has_any_column_privilege has_schema_privilege has_database_privilege
has_function_privilege has_sequence_privilege has_type_privilege
has_foreign_data_wrapper_privilege has_server_privilege has_tablespace_privilege
has_language_privilege has_parameter_privilege row_security_active
pg_index_column_has_property pg_index_has_property pg_indexam_has_property
pg_get_indexdef pg_options_to_table array_in pg_typeof pg_collation_for
pg_get_constraintdef pg_tablespace_databases pg_get_object_address
to_regclass to_regtype to_regproc to_regprocedure to_regnamespace to_regrole
to_regoper to_regoperator to_regcollation to_regtypemod pg_relation_is_publishable
pg_get_replica_identity_index pg_partition_root pg_partition_ancestors
pg_partition_tree pg_sequence_parameters pg_settings_get_flags pg_input_is_valid
pg_available_extensions pg_available_extension_versions
pg_column_compression pg_column_toast_chunk_id
"""

SAFE_FUNCTIONS: frozenset[str] = frozenset(
    (_STRING + _NUMERIC + _TIME + _AGGREGATE + _ARRAY_JSON + _MISC + _INTROSPECTION).split()
)

# Helpers PostgreSQL defines in information_schema (SQL functions over their arguments
# only), callable schema-qualified: pgjdbc's getPrimaryKeys and getIndexInfo expand
# pg_index.indkey with _pg_expandarray (an unnest with ordinality).
SAFE_INFORMATION_SCHEMA_FUNCTIONS: frozenset[str] = frozenset(["_pg_expandarray"])

# Functions with a reason to refuse, for a precise error message (all others not in
# SAFE_FUNCTIONS are refused as "not on the allowlist").
DANGEROUS_FUNCTIONS: dict[str, str] = {
    **dict.fromkeys(
        [
            "query_to_xml",
            "query_to_xmlschema",
            "query_to_xml_and_xmlschema",
            "table_to_xml",
            "table_to_xmlschema",
            "table_to_xml_and_xmlschema",
            "cursor_to_xml",
            "schema_to_xml",
            "database_to_xml",
        ],
        "runs SQL given as text",
    ),
    **dict.fromkeys(
        [
            "dblink",
            "dblink_exec",
            "dblink_connect",
            "dblink_open",
            "dblink_fetch",
            "dblink_send_query",
        ],
        "connects to another database",
    ),
    **dict.fromkeys(
        [
            "pg_read_file",
            "pg_read_binary_file",
            "pg_ls_dir",
            "pg_stat_file",
            "pg_ls_logdir",
            "pg_ls_waldir",
            "pg_ls_tmpdir",
            "pg_ls_archive_statusdir",
            "pg_file_write",
        ],
        "reads server files",
    ),
    **dict.fromkeys(
        [
            "lo_import",
            "lo_export",
            "lo_get",
            "lo_put",
            "lo_open",
            "lo_creat",
            "lo_create",
            "lo_unlink",
            "lo_from_bytea",
            "loread",
            "lowrite",
        ],
        "touches large objects",
    ),
    "set_config": "changes session settings",
    "pg_sleep": "holds the connection",
    "pg_sleep_for": "holds the connection",
    "pg_sleep_until": "holds the connection",
    "pg_terminate_backend": "acts on other sessions",
    "pg_cancel_backend": "acts on other sessions",
    "pg_advisory_lock": "takes locks",
    "nextval": "changes sequences",
    "setval": "changes sequences",
}

# pg_catalog relations client tools read to describe objects
_PG_CATALOG = """
pg_aggregate pg_am pg_amop pg_amproc pg_attrdef pg_attribute pg_auth_members
pg_cast pg_class pg_collation pg_constraint pg_conversion pg_database
pg_default_acl pg_depend pg_description pg_enum pg_event_trigger pg_extension
pg_foreign_data_wrapper pg_foreign_table pg_index pg_inherits pg_init_privs
pg_language pg_namespace pg_opclass pg_operator pg_opfamily pg_partitioned_table
pg_policy pg_proc pg_publication pg_publication_namespace pg_publication_rel
pg_range pg_rewrite pg_seclabel pg_sequence pg_shdescription pg_statistic_ext
pg_tablespace pg_transform pg_trigger pg_ts_config pg_ts_dict pg_ts_parser
pg_ts_template pg_type pg_roles pg_user pg_group pg_tables pg_views pg_matviews
pg_indexes pg_sequences pg_settings pg_available_extensions
pg_available_extension_versions pg_timezone_names pg_timezone_abbrevs
pg_publication_tables pg_policies pg_rules
pg_triggers pg_shdepend pg_attribute pg_constraint pg_foreign_server
"""
_INFORMATION_SCHEMA = """
schemata tables columns views routines parameters key_column_usage table_constraints
referential_constraints constraint_column_usage constraint_table_usage check_constraints
domains domain_constraints element_types sequences triggers character_sets collations
applicable_roles enabled_roles table_privileges column_privileges routine_privileges
usage_privileges attributes user_defined_types information_schema_catalog_name
view_table_usage view_column_usage column_udt_usage
"""

CATALOG_RELATIONS: frozenset[tuple[str, str]] = frozenset(
    [("pg_catalog", name) for name in _PG_CATALOG.split()]
    + [("information_schema", name) for name in _INFORMATION_SCHEMA.split()]
)

SAFE_SETTINGS: frozenset[str] = frozenset(
    [
        "application_name",
        "extra_float_digits",
        "datestyle",
        "timezone",
        "intervalstyle",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "transaction_timeout",
        "client_min_messages",
        "bytea_output",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "default_transaction_deferrable",
        "transaction_isolation",
        "transaction_read_only",
        "transaction_deferrable",
        "work_mem",
        "geqo",
        "enable_seqscan",
        "enable_indexscan",
        "enable_bitmapscan",
        "enable_hashjoin",
        "enable_mergejoin",
        "enable_nestloop",
        "jit",
        "lc_messages",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
        "xmloption",
    ]
)
