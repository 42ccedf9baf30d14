-- `batches.endpoint` and `batches.default_endpoint` held the same value (the endpoint of a
-- prompts file's rows that name none): one column, `default_endpoint`, is kept.
update batches set default_endpoint = endpoint
 where default_endpoint is null and endpoint is not null;
alter table batches drop column endpoint;
