-- Submits every review not submitted before; later runs add only new reviews.
{{ config(materialized='incremental', unique_key='id') }}

{{ llm_submit_rows(ref('reviews'), 'id', "'Classify the sentiment of this review: ' || src.body",
                   model='gpt-4o-mini', job='dbt_reviews', labels=['positive', 'negative', 'neutral']) }}
