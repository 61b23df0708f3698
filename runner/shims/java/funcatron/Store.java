package funcatron;

import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The document store, through the Runner (docs/runtimes.md), on the
 * collections the bundle declares ({@code store: {orders: [read, write]}}).
 * Each call is one round trip within the request's time limit; documents
 * come back as maps {@code {collection, id, version, updated_ms, doc}}.
 * A refused operation throws {@link StoreException}.
 */
public final class Store {
    /** A refused operation: its HTTP status, error code and answer. */
    public static final class StoreException extends RuntimeException {
        public final int status;
        public final String code;
        public final Object body;

        StoreException(int status, Object body) {
            super(status + " " + field(body, "error") + ": " + field(body, "message"));
            this.status = status;
            this.code = field(body, "error");
            this.body = body;
        }
    }

    private static String field(Object body, String key) {
        if (body instanceof Map) {
            Object v = ((Map<?, ?>) body).get(key);
            return v == null ? null : v.toString();
        }
        return null;
    }

    private final DataInputStream in;
    private final DataOutputStream out;

    Store(DataInputStream in, DataOutputStream out) {
        this.in = in;
        this.out = out;
    }

    private Object[] call(Map<String, Object> op) {
        try {
            Worker.send(out, List.of("store".getBytes(StandardCharsets.UTF_8),
                    Json.encode(op).getBytes(StandardCharsets.UTF_8)));
            List<byte[]> items = Worker.read(in);
            if (items == null) System.exit(0);
            if (items.size() != 3 || !"store".equals(new String(items.get(0), StandardCharsets.UTF_8)))
                throw new IllegalStateException("the Runner broke the store protocol");
            int status = Integer.parseInt(new String(items.get(1), StandardCharsets.UTF_8));
            return new Object[] {status, Json.parse(new String(items.get(2), StandardCharsets.UTF_8))};
        } catch (RuntimeException e) {
            throw e;
        } catch (Exception e) {
            throw new IllegalStateException("the store call failed: " + e, e);
        }
    }

    @SuppressWarnings("unchecked")
    private Map<String, Object> ok(Map<String, Object> op) {
        Object[] r = call(op);
        int status = (Integer) r[0];
        if (status >= 400) throw new StoreException(status, r[1]);
        return (Map<String, Object>) r[1];
    }

    private static Map<String, Object> op(String name, String collection) {
        Map<String, Object> op = new LinkedHashMap<>();
        op.put("op", name);
        op.put("collection", collection);
        return op;
    }

    /** The document, or null when there is none. */
    @SuppressWarnings("unchecked")
    public Map<String, Object> get(String collection, String id) {
        Map<String, Object> op = op("get", collection);
        op.put("id", id);
        Object[] r = call(op);
        int status = (Integer) r[0];
        if (status == 404 && "not_found".equals(field(r[1], "error"))) return null;
        if (status >= 400) throw new StoreException(status, r[1]);
        return (Map<String, Object>) r[1];
    }

    /** A page {documents, next} of the documents whose fields equal {@code filter}'s. */
    public Map<String, Object> list(String collection, Map<String, Object> filter, Integer limit, String after) {
        Map<String, Object> op = op("list", collection);
        op.put("filter", filter == null ? new LinkedHashMap<>() : filter);
        if (limit != null) op.put("limit", limit.longValue());
        if (after != null) op.put("after", after);
        return ok(op);
    }

    /** A new document; the store picks its id. */
    public Map<String, Object> create(String collection, Object doc) { return create(collection, doc, null); }

    /** A new document with this id (412 when taken). */
    public Map<String, Object> create(String collection, Object doc, String id) {
        Map<String, Object> op = op("create", collection);
        op.put("doc", doc);
        if (id != null) op.put("id", id);
        return ok(op);
    }

    private Map<String, Object> versioned(Map<String, Object> op, String id, Long ifVersion) {
        op.put("id", id);
        if (ifVersion != null) op.put("if_version", ifVersion);
        return ok(op);
    }

    /** Write the whole document (created if missing). */
    public Map<String, Object> put(String collection, String id, Object doc) { return put(collection, id, doc, null); }

    /** Write the whole document if it is at {@code ifVersion}. */
    public Map<String, Object> put(String collection, String id, Object doc, Long ifVersion) {
        Map<String, Object> op = op("put", collection);
        op.put("doc", doc);
        return versioned(op, id, ifVersion);
    }

    /** Change the document by a JSON merge patch (RFC 7396). */
    public Map<String, Object> merge(String collection, String id, Object patch) { return merge(collection, id, patch, null); }

    /** Change the document by a merge patch if it is at {@code ifVersion}. */
    public Map<String, Object> merge(String collection, String id, Object patch, Long ifVersion) {
        Map<String, Object> op = op("merge", collection);
        op.put("patch", patch);
        return versioned(op, id, ifVersion);
    }

    /** Remove the document. */
    public Map<String, Object> delete(String collection, String id) { return delete(collection, id, null); }

    /** Remove the document if it is at {@code ifVersion}. */
    public Map<String, Object> delete(String collection, String id, Long ifVersion) {
        return versioned(op("delete", collection), id, ifVersion);
    }
}
