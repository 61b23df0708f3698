package funcatron;

import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** One HTTP request as a Java Func sees it. */
public final class Request {
    public final String id, operation, method, scheme, host, path, queryString;
    /** Header names are lower-case; repeated headers are joined with ", ". */
    public final Map<String, String> headers;
    /** Path parameters from the Swagger path template. */
    public final Map<String, String> params;
    private final byte[] body;
    /** The document store, on the collections the bundle declares. */
    public final Store store;

    Request(List<byte[]> items, Store store) {
        this.store = store;
        id = s(items, 1); operation = s(items, 2); method = s(items, 3); scheme = s(items, 4);
        host = s(items, 5); path = s(items, 6); queryString = s(items, 7);
        body = items.get(8);
        int n = Integer.parseInt(s(items, 10));
        Map<String, String> h = new LinkedHashMap<>();
        for (int i = 11; i < 11 + 2 * n; i += 2) {
            String k = new String(items.get(i), StandardCharsets.ISO_8859_1);
            String v = s(items, i + 1);
            h.merge(k, v, (a, b) -> a + ", " + b);
        }
        headers = Collections.unmodifiableMap(h);
        Map<String, String> p = new LinkedHashMap<>();
        for (int i = 11 + 2 * n; i + 1 < items.size(); i += 2) p.put(s(items, i), s(items, i + 1));
        params = Collections.unmodifiableMap(p);
    }

    private static String s(List<byte[]> items, int i) {
        return new String(items.get(i), StandardCharsets.UTF_8);
    }

    /** The body bytes. */
    public byte[] body() { return body; }

    /** The body as UTF-8 text. */
    public String text() { return new String(body, StandardCharsets.UTF_8); }

    /** The body parsed as JSON: Map, List, String, Long, Double, Boolean or null. */
    public Object json() { return body.length == 0 ? null : Json.parse(text()); }

    /** A header by (case-insensitive) name, or null. */
    public String header(String name) { return headers.get(name.toLowerCase()); }

    /** Query parameters, each name with its values in order. */
    public Map<String, List<String>> query() {
        Map<String, List<String>> q = new LinkedHashMap<>();
        if (queryString.isEmpty()) return q;
        for (String pair : queryString.split("&")) {
            if (pair.isEmpty()) continue;
            int eq = pair.indexOf('=');
            String k = URLDecoder.decode(eq < 0 ? pair : pair.substring(0, eq), StandardCharsets.UTF_8);
            String v = eq < 0 ? "" : URLDecoder.decode(pair.substring(eq + 1), StandardCharsets.UTF_8);
            q.computeIfAbsent(k, x -> new ArrayList<>()).add(v);
        }
        return q;
    }

    /** The first value of a query parameter, or null. */
    public String query(String name) {
        List<String> v = query().get(name);
        return v == null ? null : v.get(0);
    }
}
