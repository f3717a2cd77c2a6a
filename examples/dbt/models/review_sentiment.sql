-- The answers as they stand at this run: rerun once the job has finished to have them all.
{{ config(materialized='table') }}

select rv.id, rv.body, a.status, a.answer as sentiment, a.error
from {{ ref('reviews') }} as rv
join ({{ llm_answers(ref('review_requests'), 'id') }}) as a using (id)
