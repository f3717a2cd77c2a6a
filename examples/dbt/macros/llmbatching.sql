{#-
  Macros for driving llmbatching from dbt.

  llm_submit_rows: the SELECT of an incremental model that submits one request per new row of
  `source_relation` and keeps its request id. Rows already submitted are skipped on later
  runs, so each row is sent (and paid for) once.

    {{ config(materialized='incremental', unique_key='id') }}
    {{ llm_submit_rows(ref('reviews'), 'id', "'Classify the sentiment: ' || src.body",
                       model='gpt-4o-mini', job='reviews', labels=['positive', 'negative', 'neutral']) }}

  The prompt is a SQL expression over the source row, aliased `src`.
-#}
{% macro llm_submit_rows(source_relation, key, prompt, model, job, instructions=none, labels=none, options=none) %}
select
    src.{{ key }} as {{ key }},
    {% if labels %}
    llmbatching.llm_submit_label(
        {{ llm_literal(model) }}, {{ prompt }},
        array[{% for label in labels %}{{ llm_literal(label) }}{% if not loop.last %}, {% endif %}{% endfor %}]::text[],
        instructions => {{ llm_literal(instructions) }},
        options => {{ llm_literal(tojson(options or {})) }}::jsonb,
        job => {{ llm_literal(job) }})
    {% else %}
    llmbatching.llm_submit(
        {{ llm_literal(model) }}, {{ prompt }},
        instructions => {{ llm_literal(instructions) }},
        options => {{ llm_literal(tojson(options or {})) }}::jsonb,
        job => {{ llm_literal(job) }})
    {% endif %} as request_id,
    now() as submitted_at
from {{ source_relation }} as src
{% if is_incremental() %}
where src.{{ key }} not in (select {{ key }} from {{ this }})
{% endif %}
{% endmacro %}

{#- llm_answers: the answers of the requests kept by an llm_submit_rows model. -#}
{% macro llm_answers(requests_relation, key) %}
select
    req.{{ key }} as {{ key }},
    llmbatching.llm_status(req.request_id) as status,
    llmbatching.llm_result(req.request_id) as answer,
    llmbatching.llm_error(req.request_id) as error,
    req.request_id
from {{ requests_relation }} as req
{% endmacro %}

{#- llm_wait_for_job: waits until a job has finished, for use between two runs:
      dbt run-operation llm_wait_for_job --args '{job: reviews, timeout: "30 minutes"}' -#}
{% macro llm_wait_for_job(job, timeout='1 hour') %}
  {% set result = run_query("select llmbatching.llm_wait(job => " ~ llm_literal(job) ~ ", timeout => " ~ llm_literal(timeout) ~ "::interval)") %}
  {% if execute %}
    {% set finished = result.columns[0].values()[0] %}
    {{ log("llmbatching job " ~ job ~ (" finished" if finished else " is still running"), info=True) }}
    {% if not finished %}
      {{ exceptions.raise_compiler_error("llmbatching job " ~ job ~ " did not finish within " ~ timeout) }}
    {% endif %}
  {% endif %}
{% endmacro %}

{#- llm_job_status: one row of progress for a job, as a query to select from. -#}
{% macro llm_job_status(job) %}
select * from llmbatching.llm_job_status({{ llm_literal(job) }})
{% endmacro %}

{#- A SQL literal for a value (NULL for none), quoting as Postgres does. -#}
{% macro llm_literal(value) %}
{%- if value is none -%} null {%- else -%} '{{ value | string | replace("'", "''") }}' {%- endif -%}
{% endmacro %}
